document.addEventListener('submit',function(ev){var f=ev.target;
if(f.dataset&&f.dataset.confirm&&!window.confirm(f.dataset.confirm)){ev.preventDefault();return;}
if(f.method==='post'){if(f.dataset.sent){ev.preventDefault();}else{f.dataset.sent='1';}}});
window.addEventListener('pageshow',function(ev){if(ev.persisted){
document.querySelectorAll('form[data-sent]').forEach(function(f){delete f.dataset.sent;});}});
document.querySelectorAll('button[data-copy]').forEach(function(b){b.hidden=false;
b.addEventListener('click',function(){var t=document.getElementById(b.dataset.copy).textContent;
if(navigator.clipboard){navigator.clipboard.writeText(t).then(function(){b.textContent='Copied';});}
else{var r=document.createRange();r.selectNodeContents(document.getElementById(b.dataset.copy));
var s=window.getSelection();s.removeAllRanges();s.addRange(r);}});});
